"""``latentdiff serve``: argparse glue over ``latentdiff.serve.app`` (fastapi and uvicorn imported only when run)."""

from __future__ import annotations

import os

from latentdiff.serve.inputs import Limits

API_KEY_ENV = "LATENTDIFF_API_KEY"  # the API key, when --api-key is not given
LIMIT_HELP = {"max_side": "most pixels of width and of height", "max_pixels": "most pixels of width x height",
              "max_steps": "most sampler steps", "max_batch": "most images", "max_prompt_chars": "longest prompt "
              "(and negative prompt), characters", "max_upload_bytes": "largest uploaded image, bytes",
              "max_upload_pixels": "largest uploaded image, pixels (read from its header before decoding)"}


def add_command(sub) -> None:
    """Add ``serve`` to the CLI's subcommands."""
    p = sub.add_parser("serve", help="serve an HTTP API (own, A1111- and OpenAI-compatible) and a web page",
                       description="Serve a model over HTTP: the own JSON API (documented at /docs), the "
                                   "AUTOMATIC1111 (/sdapi/v1) and OpenAI (/v1/images) subsets their clients speak, "
                                   "and a web page at /. One generation runs at a time; --queue-size more wait, "
                                   "the rest are answered 429.")
    p.add_argument("--model", default="default", metavar="PATH", help="model folder (ours or diffusers) or "
                   "single-file checkpoint (default: the bundled default model)")
    p.add_argument("--tokenizer", default="", metavar="DIR", help="single-file checkpoints: the tokenizer folder")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="denoiser precision")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860, A1111's)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help=f"ask this key of every API call (default: ${API_KEY_ENV}; none: no key)")
    p.add_argument("--queue-size", type=int, default=4, metavar="N", help="jobs waiting behind the running one; more are answered 429 (default 4)")
    for name, value in Limits().__dict__.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=value, metavar="N",
                       help=f"per request: {LIMIT_HELP[name]} (default {value})")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> None:
    from latentdiff.pipeline import load

    try:
        import uvicorn

        from latentdiff.serve.app import ServeConfig, create_app
    except ImportError as e:
        raise ImportError(f"{e}: latentdiff serve needs the serve extra: pip install 'latentdiff[serve]'") from None
    limits = Limits(**{k: getattr(args, k) for k in Limits().__dict__})
    for name, value in {"queue_size": args.queue_size, "port": args.port, **limits.__dict__}.items():
        if value < (0 if name == "queue_size" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV, "")
    config = ServeConfig(host=args.host, port=args.port, api_key=key, queue_size=args.queue_size, limits=limits)
    pipe = load(args.model, precision=args.precision, **({"tokenizer": args.tokenizer} if args.tokenizer else {}))
    if args.model == "default":
        pipe.name = "default"  # what the APIs call the bundled model (its folder is named "model")
    app = create_app(pipe, config)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning"))
    print(f"latentdiff: serving {pipe.name} at http://{_url_host(args.host)}:{args.port}/ (API docs at /docs)"
          f"{'; API key required' if key else ''}", flush=True)
    try:
        server.run()
    finally:
        app.state.queue.close()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
