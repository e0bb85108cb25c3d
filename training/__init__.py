"""Compact fine-tuning on Hugging Face models (LoRA, full SFT, prompt tuning, p-tuning) with peft.

    from training.config import FinetuneConfig
    from training.trainer import finetune
    result = finetune(FinetuneConfig(model=ckpt, data=train_jsonl, output_dir=out,
                                     template="Question: {question} Answer: {answer}"))

Outputs PEFT adapters (or a full checkpoint) that `kiln merge` / `build-engine --lora` consume.
"""
