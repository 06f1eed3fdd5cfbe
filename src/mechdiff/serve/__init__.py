"""`mechdiff serve RUN_DIR [RUN_DIR ...]`: a local explorer over finished runs.

Pages: Overview (each stage's headline and interactive Figures A-D), Texts (the `tokens` stage's
per-token divergence), Live (both models on a typed prompt, with an optional RQ3 handle), Compare
(several runs overlaid). ``runs`` reads the run directories (and nothing outside them), ``live``
holds the models, ``app`` routes; the page's JS/CSS ship in ``static/`` (no build step).

    from mechdiff.serve import serve
    serve(["runs/demo/planted-cultural"], port=8765)
"""
from mechdiff.serve.app import make_app, run_app, serve, serve_in_thread

__all__ = ["make_app", "run_app", "serve", "serve_in_thread"]
