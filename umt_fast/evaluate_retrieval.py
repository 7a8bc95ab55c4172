"""Zero-shot video-text retrieval: ``python -m umt_fast.evaluate_retrieval --help``
(the implementation is umt_fast.vl.retrieval)."""
import sys

from umt_fast.vl.retrieval import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m umt_fast.evaluate_retrieval"))
