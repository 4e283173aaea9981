"""Running a trained model: KV-cache generation (`generate`) and log-likelihoods of
continuations (`likelihood`), shared by training's samples and by evaluation."""
