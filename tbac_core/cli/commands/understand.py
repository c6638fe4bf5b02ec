"""``understand``: ask the model's Qwen2.5-VL about images and print the answer."""
from __future__ import annotations

import sys

from ...params import GenerationSettings
from ..context import CommandContext
from ..images import check_image_path, load_input_image
from ..options import model_options

SETTINGS_FIELDS = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "seed")
_DEFAULTS = GenerationSettings()


def add_understand_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "understand", parents=[model_options(compile_option=False)],
        help="Ask the model's Qwen2.5-VL about images; prints the answer.",
        description="Ask a question about images (or a text-only question) and print the answer. Decoding "
                    "defaults are those of tbac_core.params.GenerationSettings (greedy).")
    parser.add_argument("--image", "-i", action="append", default=[], metavar="PATH",
                        help="Image to show the model; repeatable. None: a text-only question.")
    parser.add_argument("--question", "-q", default="", help="The question; with --preset, extra instructions.")
    parser.add_argument("--preset", help="A built-in question ('describe in detail', 'short caption', 'write a "
                        "generation prompt for this image', ...); default: 'custom' (the question alone) when "
                        "--question is given, else the first preset.")
    parser.add_argument("--system-prompt", default=None, help="Optional system prompt (default: Qwen2.5-VL's own).")
    settings = parser.add_argument_group("decoding")
    settings.add_argument("--max-new-tokens", type=int, help=f"Longest answer in tokens (default {_DEFAULTS.max_new_tokens}).")
    settings.add_argument("--do-sample", action="store_true", default=None,
                          help="Sample with the settings below instead of greedy decoding.")
    settings.add_argument("--temperature", type=float, help=f"Sampling only: higher is more varied (default "
                          f"{_DEFAULTS.temperature}).")
    settings.add_argument("--top-p", type=float, help=f"Sampling only: nucleus probability (default {_DEFAULTS.top_p}).")
    settings.add_argument("--top-k", type=int, help=f"Sampling only; 0 = no limit (default {_DEFAULTS.top_k}).")
    settings.add_argument("--repetition-penalty", type=float, help=f"Above 1 discourages repeats; 1 = off (default "
                          f"{_DEFAULTS.repetition_penalty}).")
    settings.add_argument("--seed", type=int, help=f"Sampling only: the same seed repeats the answer (default "
                          f"{_DEFAULTS.seed}).")
    parser.set_defaults(handler=run_understand)


def run_understand(ctx: CommandContext) -> int:
    args = ctx.args
    for path in args.image:  # before anything heavy is imported, like every other command
        check_image_path(path, "--image")
    settings = GenerationSettings(**{k: getattr(args, k) for k in SETTINGS_FIELDS if getattr(args, k) is not None})
    settings.validate()
    ctx.info()  # a missing or broken model folder is reported before anything is read

    from ...pipeline import (  # torch & co.: only once the arguments are good
        PRESETS,
        answer,
        resolve_question,
    )

    preset = args.preset or ("custom" if args.question.strip() else next(iter(PRESETS)))
    question = resolve_question(preset, args.question)
    images = [load_input_image(path).image for path in args.image]
    pipe = ctx.pipeline()

    from tqdm import tqdm

    with tqdm(total=settings.max_new_tokens, unit="token", disable=None, file=sys.stderr, leave=False) as bar:
        def progress(done: int, total: int) -> None:
            bar.update(done - bar.n)

        # The pipeline (not its model) is passed so that its memory mode places the MLLM.
        reply = answer(pipe, question, images=images or None, system_prompt=args.system_prompt,
                       settings=settings, callback=progress)
    print(reply)
    return 0
