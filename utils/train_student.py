"""Teacher-student: a teacher trained on the few labels labels unlabeled images; a plain segmenter learns from both.

Examples:
  python utils/train_student.py                                   # 20 labels, 1000 unlabeled toy faces, the DDPM read-out teaches
  python utils/train_student.py --set student.teacher=fused       # read-out + a segmenter on the labels teach
  python utils/train_student.py --set labels.num_labeled=5 --set student.rounds=1 --set student.base_channels=16

The teacher (section student) is the configured read-out on the DDPM's features of the first
labels.num_labeled labeled images, averaged with section segmenter's network trained on the same images
when student.teacher=fused. It labels the first student.unlabeled of the DDPM's training images
(data.source; pixels below student.confidence become ignore), and the student, section segmenter's network,
trains on those and the real pairs (with student.rounds > 1 each student relabels the unlabeled images for
the next; pseudo_labels.png shows the teacher's). Teacher and student are both scored on the test split.
Writes student.out_dir/student.pt (format diffuseseg-segmenter/1, as train_segmenter.py), metrics.json
(the student's per-class IoU), summary.json (teacher and student mIoU, timings), pseudo_labels.png
(unlabeled images over their pseudo-labels, ignored pixels black) and the resolved config.yaml.
"""
import json
import time
from pathlib import Path

import numpy as np

from diffuseseg.cli import config_from_args, config_parser, run_main
from diffuseseg.config import save_config
from diffuseseg.datasets import labeled_split, unlabeled_images
from diffuseseg.io import atomic_save_image, atomic_write_text, exclusive_folder
from diffuseseg.metrics import METRICS_FILE, evaluate
from diffuseseg.runtime import configure_run, resolve_device
from diffuseseg.segmenter import predict_masks, save_configured_segmenter
from diffuseseg.self_training import (UNLABELED_KEYS, fit_teacher, pseudo_masks, student_segmenter_config,
                                     train_student)
from diffuseseg.visualize import image_grid, overlay


def main() -> None:
    args = config_parser(__doc__.splitlines()[0], __doc__.split("\n", 2)[2]).parse_args()
    cfg = config_from_args(args)
    configure_run(cfg.run)
    device = resolve_device(cfg.run.device)
    st, lab = cfg.student, cfg.labels
    pool = labeled_split(cfg, "labeled")
    _, images, masks = pool.load(range(lab.num_labeled))
    test_names, test_images, test_masks = labeled_split(cfg, "test").load()
    unlabeled = unlabeled_images(cfg, st.unlabeled, exclude=pool.names + test_names)
    names = pool.classes.names

    start = time.perf_counter()
    teacher = fit_teacher(cfg, images, masks, pool.classes, device)
    probabilities = teacher.probabilities(unlabeled, range(UNLABELED_KEYS, UNLABELED_KEYS + len(unlabeled)))
    pseudo = pseudo_masks(probabilities, st.confidence, lab.ignore_index)
    teacher_seconds = time.perf_counter() - start
    student = train_student(cfg, images, masks, unlabeled, pseudo, names, device=device)
    student_seconds = time.perf_counter() - start - teacher_seconds

    teacher_masks = teacher.probabilities(test_images, range(len(test_images))).argmax(-1).numpy()
    teacher_miou = evaluate(list(teacher_masks), list(test_masks), names, lab.ignore_index).miou
    report = evaluate(list(predict_masks(student, test_images, cfg.segmenter.batch_size)), list(test_masks), names,
                      lab.ignore_index)
    summary = {"teacher": st.teacher, "labeled": lab.num_labeled, "unlabeled": len(unlabeled), "rounds": st.rounds,
               "ignored_fraction": float((pseudo == lab.ignore_index).mean()),
               "teacher_miou": teacher_miou, "student_miou": report.miou, "test_images": len(test_images),
               "teacher_seconds": round(teacher_seconds, 1), "student_seconds": round(student_seconds, 1)}

    out = Path(st.out_dir)
    with exclusive_folder(out):
        save_configured_segmenter(out / "student.pt", student, student_segmenter_config(cfg), pool.classes, summary)
        atomic_write_text(out / METRICS_FILE, report.to_json())
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
        atomic_save_image(pseudo_label_sheet(unlabeled[:16], pseudo[:16], pool.classes.palette, lab.ignore_index),
                          out / "pseudo_labels.png")
        save_config(cfg, out / "config.yaml")
    print(report.table())
    print(f"teacher ({st.teacher}, {lab.num_labeled} labels) mIoU {teacher_miou:.4f} -> student mIoU {report.miou:.4f} "
          f"on {len(test_images)} test images; {len(unlabeled)} pseudo-labeled images "
          f"({summary['ignored_fraction']:.1%} of pixels ignored); teacher {teacher_seconds:.0f} s, "
          f"student {student_seconds:.0f} s -> {out}")


def pseudo_label_sheet(images: np.ndarray, masks: np.ndarray, palette: np.ndarray, ignore_index: int,
                       per_row: int = 8):
    """Rows of up to ``per_row`` images, each above their pseudo-labels (ignored pixels black), 4x scale."""
    tiles = overlay(images, np.where(masks == ignore_index, 0, masks), palette)
    tiles[masks == ignore_index] = 0
    blank = np.full((per_row, *images.shape[1:]), 255, np.uint8)  # pads a last, shorter row
    rows = [np.concatenate([part[lo:lo + per_row], blank[:max(0, lo + per_row - len(images))]])
            for lo in range(0, len(images), per_row) for part in (images, tiles)]
    return image_grid(np.concatenate(rows), nrow=per_row, scale=4)

if __name__ == "__main__":
    run_main(main)
