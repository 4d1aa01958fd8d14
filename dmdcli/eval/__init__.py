"""Evaluation: FID, KID, patch FID and CLIP score with the published COCO protocols.

protocol.py    the prompt/reference sets (coco30k, coco10k, captioned folders)
preprocess.py  crop/resize of the protocol, patch crop, clean-fid's resize
features.py    feature extractors (clean-fid Inception, a file, any TorchScript) and extraction
metrics.py     FID, KID, CLIP score
cache.py       reference statistics on disk
report.py      score() -> report dict, JSON files, the comparison table
run.py         `dmd eval`'s glue: benchmarks (--fid), what to evaluate and its files, evaluate()
generation.py  drawing a benchmark's images, with seconds and network evaluations per image
"""

from dmdcli.eval.cache import StatsCache, default_cache_dir
from dmdcli.eval.features import FeatureExtractor, extract, load_extractor
from dmdcli.eval.metrics import ClipScorer
from dmdcli.eval.protocol import COCO_PROTOCOLS, ReferenceSet, load_reference_set
from dmdcli.eval.report import read_report, render_table, score, write_report

__all__ = [
    "COCO_PROTOCOLS",
    "ClipScorer",
    "FeatureExtractor",
    "ReferenceSet",
    "StatsCache",
    "default_cache_dir",
    "extract",
    "load_extractor",
    "load_reference_set",
    "read_report",
    "render_table",
    "score",
    "write_report",
]
