"""Names of the columns precompute adds to a batch: a leaf module, so the training step can read them without
importing Ray Data (``precompute`` runs the encoders in a Ray Data actor pool)."""

LATENT_COLUMN = "latent_moments"  # the VAE's latent distribution parameters, [2·C, h, w] per row
EMBED_COLUMNS = ("prompt_embeds", "pooled")
TOKEN_COLUMNS = ("input_ids", "input_ids_2")
