"""The single-machine trainer: its YAML config (`config`), data and corpus, placement sampling, the
distillation loss and the training loop (`trainer`, console script `supernet-train`)."""
