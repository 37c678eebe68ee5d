"""Long Range Arena: data loaders, the authors' models and recipes, training."""
