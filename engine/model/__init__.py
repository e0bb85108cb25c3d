"""Model implementations executed by Kiln's runtime."""
