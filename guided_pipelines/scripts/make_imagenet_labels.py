"""Write ``guided_pipelines/imagenet_labels.json``: the 1000 ImageNet-1k class names in class-index
order, each the WordNet synonyms string of its synset (``"tench, Tinca tinca"``).

The sources are the data files shipped with ``timm`` (``timm/data/_info/``): ``imagenet_synsets.txt``
(the synset ids in index order) and ``imagenet_synset_to_lemma.txt`` (synset id → synonyms). Note
that two classes share the name "crane" (134, the bird; 517, the machine), as in WordNet.

    python guided_pipelines/scripts/make_imagenet_labels.py [--output PATH]
"""

import argparse
import json
from importlib import resources
from pathlib import Path

OUTPUT = Path(__file__).resolve().parents[1] / "imagenet_labels.json"


def build_labels() -> list[str]:
    """The 1000 class names, index order, from timm's ImageNet data files."""
    info = resources.files("timm") / "data" / "_info"
    synsets = (info / "imagenet_synsets.txt").read_text().split()
    lemmas = {}
    for line in (info / "imagenet_synset_to_lemma.txt").read_text().splitlines():
        synset, _, names = line.partition("\t")
        lemmas[synset] = names.strip()
    if len(synsets) != 1000 or len(set(synsets)) != 1000:
        raise ValueError(f"expected 1000 distinct ImageNet-1k synsets, found {len(set(synsets))}")
    missing = [s for s in synsets if not lemmas.get(s)]
    if missing:
        raise ValueError(f"no names for synsets {missing[:5]}")
    return [lemmas[s] for s in synsets]


def write_labels(path: Path = OUTPUT) -> None:
    path.write_text(json.dumps(build_labels(), indent=0, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=OUTPUT)
    write_labels(parser.parse_args().output)
