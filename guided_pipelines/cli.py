"""``guided-pipelines``: one command, one verb per job.

Each verb lives in the module that does its job; that module provides ``add_arguments(parser)`` and
``run(args) -> int``. Only the chosen verb's module is imported."""

import argparse
import difflib
import importlib
import sys

VERBS = {
    "sample": ("guided_pipelines.sampling_cli", "guided sampling to a labelled image grid (the main job)"),
    "convert": ("guided_pipelines.conversion", "convert an original guided-diffusion checkpoint"),
    "evaluate": ("guided_pipelines.evaluator", "IS / FID / sFID / precision / recall of a sample batch"),
    "generate": ("guided_pipelines.generation", "resumable sample generation to the original .npz format"),
}


def _usage() -> str:
    lines = ["usage: guided-pipelines VERB [options]", "", "verbs:"]
    lines += [f"  {verb:<10} {help_}" for verb, (_, help_) in VERBS.items()]
    lines += ["", "Run 'guided-pipelines VERB --help' for a verb's options."]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    verb = argv[0]
    if verb not in VERBS:
        close = difflib.get_close_matches(verb, VERBS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        print(f"guided-pipelines: unknown verb '{verb}'{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, help_ = VERBS[verb]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"guided-pipelines {verb}", description=help_)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"guided-pipelines {verb}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
