"""What goes in: checkpoint IO, seeded recipes, prompts and token batches, tokenizers."""
