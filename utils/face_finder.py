"""Make what segment.py's face finding (segment.align=auto) needs: scenes to train a face finder on, and the
training faces' canonical framing.

Examples:
  # the canonical framing: mean eye, nose and mouth positions of the read-out's training masks
  python utils/face_finder.py --config configs/celebamask_hq64.yaml --framing checkpoints/celebahq_64/framing.json \
      --fit-to eye_image_left eye_image_right mouth
  # scenes: labeled faces at random sizes, places and tilts (one, two or none per scene) -> a labeled folder
  python utils/face_finder.py --config configs/celebamask_hq64.yaml --scenes 12000 --out runs/finder_scenes \\
      --faces ../shared/data/celebamask_hq_ce/labeled[0:200] ../shared/data/celebamask_hq_extra/labeled
  # then train the finder on them like any segmenter, and point segment.finder at it
  python utils/train_segmenter.py --config configs/celebamask_hq64.yaml --train runs/finder_scenes \\
      --test runs/finder_scenes_val --set segmenter.levels=4 --set segmenter.steps=4000 --set segmenter.batch_size=16 \\
      --out checkpoints/face_finder_64

Scenes are drawn by diffuseseg.face_align.random_scenes (sizes 0.3-1.5 of the scene for a face's whole square,
tilts up to 45 degrees, mirror images, plain / noisy / blurred-photo backgrounds), made from the faces at
2x model.im_size so that small faces do not alias. Every folder argument takes an optional [start:stop] of its
pairs by name; never give it test faces. Writes the labeled layout (images/, masks/, classes.json) and the
resolved config.yaml.
"""
import json

from diffuseseg.cli import config_from_args, config_parser, run_main
from diffuseseg.config import save_config
from diffuseseg.face_align import LANDMARKS, SceneSpec, random_scenes
from diffuseseg.io import atomic_write_text, exclusive_folder
from diffuseseg.label_formats import resolve_classes, write_labeled_set
from diffuseseg.photo_faces import measure_canonical
from diffuseseg.segmenter import load_training_folders
from diffuseseg.views import flip_lookup, mirror_pairs


def main() -> None:
    parser = config_parser(__doc__.splitlines()[0], __doc__.split("\n", 2)[2])
    parser.add_argument("--framing", metavar="JSON", help="write the canonical framing of labels.labeled_dir's masks")
    parser.add_argument("--fit-to", nargs="+", default=list(LANDMARKS), metavar="LANDMARK",
                        help=f"with --framing: the landmarks a face's transform is fit to, two or more of "
                             f"{' '.join(LANDMARKS)} (default: all)")
    parser.add_argument("--scenes", type=int, default=0, metavar="N", help="write N scenes to --out")
    parser.add_argument("--faces", nargs="+", metavar="DIR[a:b]", help="labeled folders the scenes are made of")
    parser.add_argument("--out", metavar="DIR", help="folder for the scenes")
    parser.add_argument("--seed", type=int, default=None, help="scene seed (default: segmenter.seed)")
    args = parser.parse_args()
    if not args.framing and not args.scenes:
        parser.error("nothing to do: give --framing JSON and/or --scenes N")
    cfg = config_from_args(args)
    if args.framing:
        canonical, split = measure_canonical(cfg, args.fit_to)
        atomic_write_text(args.framing, json.dumps(dict(canonical.to_dict(), source=str(split.root),
                                                        positions=list(cfg.labels.labeled_range)), indent=1))
        print(f"canonical framing of {canonical.faces} faces ({split.root}) -> {args.framing}")
    if args.scenes:
        if not (args.faces and args.out):
            parser.error("--scenes needs --faces and --out")
        lab = cfg.labels
        named = resolve_classes(lab.classes, lab.labeled_dir, lab.format) if lab.classes else None
        images, masks, classes, counts = load_training_folders(args.faces, 2 * cfg.model.im_size, None, named)
        for spec, n in zip(args.faces, counts):
            print(f"faces: {n} from {spec}")
        pairs = mirror_pairs(classes.names)
        seed = cfg.segmenter.seed if args.seed is None else args.seed
        scene_images, scene_masks = random_scenes(images, masks, args.scenes,
                                                  cfg.model.im_size, seed, None if pairs is None else flip_lookup(pairs),
                                                  SceneSpec())
        with exclusive_folder(args.out):
            write_labeled_set(args.out, [f"scene{i:06d}" for i in range(args.scenes)], scene_images, scene_masks,
                              classes)
            save_config(cfg, f"{args.out}/config.yaml")
        print(f"{args.scenes} scenes -> {args.out}")


if __name__ == "__main__":
    run_main(main)
