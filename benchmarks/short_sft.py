"""Write the short-answer SFT set (satlm.data.corpus.short_answer_pairs) as JSONL, for the packing figures.

    python benchmarks/short_sft.py OUT_DIR   # OUT_DIR/short_train.jsonl, OUT_DIR/short_eval.jsonl
"""

import json
import sys
from pathlib import Path

from satlm.data.corpus import short_answer_pairs

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
for split in ("train", "eval"):
    rows = short_answer_pairs(split)
    with (out / f"short_{split}.jsonl").open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(split, len(rows), "examples")
