"""Regenerate the tiny benchmark TSVs in this folder (``python make_fixtures.py``).

Each file follows the column layout of the VLMEvalKit TSV it imitates (tab-separated, first row
the header, minimal quoting as pandas writes it). Images are 8x8 single-colour PNGs, base64; the
colour of row ``index`` is ``colour(index)`` so tests can check which image a sample got.
"""

from __future__ import annotations

import base64
import csv
import io
from pathlib import Path

from PIL import Image

HERE = Path(__file__).parent


def colour(index: int) -> tuple[int, int, int]:
    return ((37 * index) % 256, (91 * index + 50) % 256, (53 * index + 100) % 256)


def png_b64(index: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour(index)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write(name: str, header: list[str], rows: list[list]) -> None:
    with open(HERE / name, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(header)
        for r in rows:
            w.writerow(["" if v is None else v for v in r])


def main() -> None:
    # V*: 4-option direct_attributes and 2-option relative_position questions; row 3 reuses row 0's
    # image through VLMEvalKit's index reference.
    write("VStarBench.tsv", ["index", "question", "answer", "category", "A", "B", "C", "D", "image"], [
        [0, "What is the color of the woman's bag?", "B", "direct_attributes", "red", "white", "black", "blue", png_b64(0)],
        [1, "Is the cup on the left or right side of the laptop?", "A", "relative_position", "left", "right", None, None, png_b64(1)],
        [2, 'What is written on the "EXIT" sign?\n(look closely)', "D", "direct_attributes", "ENTER", "STOP", "OPEN", "EXIT", png_b64(2)],
        [3, "Is the dog on the left or right side of the bench?", "B", "relative_position", "left", "right", None, None, "0"],
    ])
    # HR-Bench: single / cross instance perception, cycle_category for circular evaluation.
    write("hr_bench_4k.tsv", ["index", "question", "answer", "category", "A", "B", "C", "D", "cycle_category", "image"], [
        [0, "What is the number displayed above the entrance?", "A", "single", "27B", "37B", "27D", "27E", "0", png_b64(10)],
        [1, "Which vehicle is closest to the traffic light?", "C", "cross", "bus", "truck", "taxi", "bicycle", "0", png_b64(11)],
        [2, "What color is the umbrella held by the child?", "D", "single", "green", "yellow", "red", "purple", "1", png_b64(12)],
    ])
    # MME-RealWorld-Lite: five "(X) text" options in one literal-list column, category + l2-category.
    write("mme_realworld_lite.tsv", ["index", "image", "question", "multi-choice options", "answer", "category", "l2-category"], [
        [100, png_b64(20), "What is the license plate number of the white car?",
         str(["(A) AB123", "(B) AB128", "(C) XB123", "(D) AB723", "(E) The image does not feature the plate."]),
         "A", "Perception/Autonomous_Driving", "object_identification"],
        [101, png_b64(21), "How many people are waiting at the crosswalk?",
         str(["(A) 2", "(B) 3", "(C) 4", "(D) 5", "(E) The image does not feature the people."]),
         "C", "Perception/Monitoring", "counting"],
        [102, png_b64(22), "What's the price of the item on the top shelf?",
         str(["(A) $3.99", "(B) $4.99", "(C) $5.49", "(D) $2.99", "(E) The image does not feature the price."]),
         "B", "Perception/OCR_with_Complex_Context", "product"],
    ])
    # VisualPuzzles: options as a literal list of texts, empty when drawn in the image; two images
    # in row 2 (literal list of base64 strings).
    write("VisualPuzzles.tsv", ["index", "image", "question", "options", "answer", "category", "difficulty"], [
        [0, png_b64(30), "Which shape completes the pattern?", str(["circle", "square", "triangle", "star"]),
         "C", "Algorithmic", "easy"],
        [1, png_b64(31), "Which piece fits the gap?", None, "A", "Spatial", "medium"],
        [2, str([png_b64(32), png_b64(33)]), "Which of the two figures has more edges?", str(["left", "right"]),
         "B", "Analogical", "hard"],
    ])


if __name__ == "__main__":
    main()
