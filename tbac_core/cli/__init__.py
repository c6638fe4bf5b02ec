"""The command line: ``python -m tbac_core <command>``, for scripts and batch rendering without ComfyUI.

Commands::

    python -m tbac_core generate --prompt "a red circle on a blue background" --out outputs
    python -m tbac_core generate --prompt "a red circle" --init-image photo.png --denoise 0.6
    python -m tbac_core edit --image photo.png --prompt "make the sky purple" --out outputs
    python -m tbac_core understand --image photo.png --question "What is in this picture?"
    python -m tbac_core batch prompts.jsonl --out renders        # or a .csv file
    python -m tbac_core generate --from-png outputs/tbac_0_0.png  # render an output again

The model folder comes from ``--model``, else ``$TBAC_MODEL``, else the built-in demo model.
Every PNG carries its parameters (see ``tbac_core.io.pngmeta``).

Layout: ``options`` (the model flags, shared with ``train``; where the model is), ``checkpoint_info``
(what config.json says, read before any weight), ``jobs`` (the job table, conversion and checks),
``images`` (the one image-path check, reading), ``render`` (one job, output records), ``rows`` and
``batch`` (rows -> jobs, resume, manifest), ``commands/`` (one module per sub-command), ``app``
(parser, errors, exit codes).

Adding a sub-command: write ``add_parser(subparsers)``, which creates the parser with
``subparsers.add_parser(name, parents=[model_options()], help=...)`` (the parent only if it
loads a model) and sets ``parser.set_defaults(handler=run)``, where ``run(ctx: CommandContext)
-> int``; ``ctx.args`` holds the parsed arguments, ``ctx.info()`` the checkpoint's config facts and
``ctx.pipeline()`` loads the model once. Append ``add_parser`` to ``commands.COMMANDS``. Check the
arguments before ``ctx.pipeline()`` and keep imports of torch & co. inside ``run``, so that
``--help`` and argument errors stay fast.
"""
from .._exports import lazy_exports

_EXPORTS = {  # module -> the names it exports
    ".app": ("main", "build_parser"),
    ".context": ("CommandContext",),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
