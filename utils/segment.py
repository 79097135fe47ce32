"""Segment images with the trained ensemble; evaluate against ground truth where it exists.

Examples:
  python utils/segment.py                                       # the labeled test split: masks + mIoU
  python utils/segment.py --set segment.input_dir=my_images     # any folder of images: masks only

Writes segment.out_dir/masks/<name>.png (index PNGs with the palette embedded), colour/ and
overlay/ PNGs, grid.png (image | ground truth | prediction | overlay, as the model saw them; no ground truth
column for a folder of images),
uncertainty.csv (per-image score, official top-10% rule) and, with ground truth, metrics.json and
the per-class IoU table. Images of segment.input_dir get masks, colour masks and overlays at their own
size; segment.crop=center (default) leaves the cut-off ends of a non-square image as labels.ignore_index
(hatched in the overlay), segment.crop=pad segments all of it:
  python utils/segment.py --set segment.input_dir=my_photos --set segment.crop=pad

Photos are not aligned as the training faces are: with segment.align=auto (the default) each face is found
(segment.finder), aligned to the training faces' framing, segmented and pasted back at the photo's size;
faces/<name>.json lists each face (box, landmarks, transform, uncertainty), and a photo without a face gets
one line and an all-background mask. A lone face already framed like the training faces keeps segment.crop:
  python utils/segment.py --config configs/celebamask_hq64.yaml --set segment.input_dir=my_photos
  python utils/segment.py --set segment.input_dir=my_images --set segment.align=none   # the square framing only

Under torchrun the images are split across ranks (same files, byte for byte, as one process):
  torchrun --nproc_per_node=4 utils/segment.py --set segment.input_dir=many_images
"""
from diffuseseg.cli import config_from_args, config_parser, run_main
from diffuseseg.datasets import labeled_split
from diffuseseg.runtime import configure_run, device_for, init_distributed
from diffuseseg.photo_faces import face_segmenter
from diffuseseg.segment_outputs import read_photos, segment_faces_to_folder, segment_to_folder
from diffuseseg.segmentation import configured_views, load_trained_stack


def main() -> None:
    args = config_parser(__doc__.splitlines()[0], __doc__.split("\n", 2)[2]).parse_args()
    cfg = config_from_args(args)
    configure_run(cfg.run)
    dist_info = init_distributed()
    extractor, ensemble, classes = load_trained_stack(cfg, device_for(dist_info, cfg.run.device))
    photos = None
    if cfg.segment.input_dir and cfg.segment.align == "auto":
        faces = face_segmenter(cfg, extractor, ensemble, classes, configured_views(cfg, classes.names, "test"))
        if faces is not None:
            count = segment_faces_to_folder(cfg, faces, classes, cfg.segment.input_dir, cfg.segment.out_dir,
                                            dist_info=dist_info)
            if dist_info.is_main:
                print(f"wrote {count} masks to {cfg.segment.out_dir}/masks (faces: {cfg.segment.out_dir}/faces)")
            return
    if cfg.segment.input_dir:
        names, photos, images = read_photos(cfg.segment.input_dir, cfg.model.im_size, cfg.segment.crop,
                                            cfg.data.on_bad_image)
        gt = None
    else:
        names, images, gt = labeled_split(cfg, "test").load()
    report = segment_to_folder(cfg, extractor, ensemble, classes, names, images, gt, cfg.segment.out_dir,
                               photos=photos, dist_info=dist_info)
    if not dist_info.is_main:
        return
    if report is not None:
        print(report.table())
        print(f"mIoU {report.miou:.4f} over {len(names)} test images; pixel accuracy {report.pixel_accuracy:.4f}")
    print(f"wrote {len(names)} masks to {cfg.segment.out_dir}/masks")


if __name__ == "__main__":
    run_main(main)
