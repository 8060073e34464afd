"""Model definitions (plain nn.Modules built from Hugging Face configs) and weight loading."""
