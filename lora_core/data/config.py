"""How a dataset is read: its settings and their allowed values (the dataset itself is in `dataset`)."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import LoRALabError
from ..settings import Setting, Widget, declared_settings, out_of_range, setting
from .videos import FRAME_EXTRACTIONS


class DatasetError(LoRALabError, ValueError):
    """Raised for a dataset that cannot be used; the message names the path and the fix."""


LOSS_MASKS = ("none", "masks", "alpha")
PROBABILITY = {"minimum": 0.0, "maximum": 1.0, "allowed": "a probability from 0 to 1",
               "widget": Widget(step=0.01)}


@dataclass(frozen=True)
class DatasetConfig:
    """How images are found, captioned, sized and repeated."""

    resolution: int = setting(512, "Images are resized (short side) and centre-cropped to this square size; with "
                                   "bucketing, buckets hold about resolution² pixels.",
                              minimum=8, multiple_of=8, allowed="a multiple of 8 that is >= 8 (e.g. 512, 768, 1024)",
                              widget=Widget(minimum=64, maximum=2048, step=8))
    caption_extension: str = setting(".txt", "Extension of the caption file next to each image.", widget=Widget())
    default_caption: str = setting("a photo of {token}", "Caption for images without a caption file; {token} is "
                                                         "replaced by the token.", widget=Widget())
    token: str = setting("sks", "The placeholder word for your concept, substituted for {token} in every caption.",
                         widget=Widget())
    repeats: int = setting(1, "How often each image is seen per epoch, on top of N_name folder repeats.",
                           minimum=1, allowed="an integer >= 1", widget=Widget(maximum=1000))
    flip: bool = setting(False, "Randomly mirror images left-right while training.", widget=Widget())
    max_image_pixels: int = setting(64_000_000, "images larger than this are skipped (decompression-bomb guard)",
                                    minimum=1, allowed="an integer >= 1", cli=False)
    bucketing: bool = setting(False, "Aspect-ratio buckets (kohya): each image is scaled to cover the bucket of about "
                                     "resolution² pixels nearest its shape and centre-cropped, instead of a square "
                                     "crop.", widget=Widget())
    no_upscale: bool = setting(False, "With bucketing: never enlarge an image; its bucket is its own size (scaled down "
                                      "to about resolution² pixels if larger) cropped to 64 px steps (kohya's "
                                      "bucket_no_upscale).", widget=Widget())
    min_bucket_size: int = setting(256, "With bucketing: the shortest bucket side.",
                                   widget=Widget(minimum=64, maximum=4096, step=64))
    max_bucket_size: int = setting(1024, "With bucketing: the longest bucket side.",
                                   widget=Widget(minimum=64, maximum=4096, step=64))
    bucket_step: int = setting(64, "with bucketing: bucket sides are multiples of this", cli=False)
    shuffle_tags: bool = setting(False, "Shuffle the comma-separated tags of each caption every time it is drawn.",
                                 widget=Widget())
    keep_tokens: int = setting(0, "How many leading tags stay in place when shuffling or dropping.",
                               minimum=0, allowed="0 or more leading tags", widget=Widget(maximum=100))
    caption_dropout: float = setting(0.0, "Chance that an image is trained with an empty caption.", **PROBABILITY)
    tag_dropout: float = setting(0.0, "Chance that each tag after keep_tokens is left out.", **PROBABILITY)
    control_images: bool = setting(False, "Edit pairs (Flux.1 Kontext; Qwen-Image-Edit, up to 3 references): each "
                                          "image's reference image is the "
                                          "same-stem image in the control/ folder beside it (control/<stem>_0, "
                                          "<stem>_1 … for several), fitted to the image's size and mirrored with it; "
                                          "the model sees it as its reference and learns the edit. An image without "
                                          "its reference is refused.", widget=Widget())
    loss_mask: str = setting("none", "Weigh each pixel's loss (kohya's masked loss). masks: a same-stem grey image "
                                     "in the masks/ folder beside each image, of the image's size (white: full "
                                     "weight, black: none). alpha: the image's own alpha channel (an image without "
                                     "one weighs every pixel fully). Each mask is fitted and mirrored with its image "
                                     "and averaged down to the latent grid. A missing, wrongly sized or all-black "
                                     "mask is refused, named; class images weigh every pixel fully.",
                             choices=LOSS_MASKS, allowed=f"one of {LOSS_MASKS}", widget=Widget())
    frames: int = setting(1, "Frames of each video clip (mp4, webm, mov, mkv, gif among the images, captioned by the "
                             "same stem rules): video models take 4k+1 (Wan, HunyuanVideo: 17, 33, 49, 81); images "
                             "train as one-frame videos. At 1 the clips are skipped, each named: images only.",
                          minimum=1, allowed="an integer >= 1", widget=Widget(maximum=1025))
    frame_stride: int = setting(1, "Clips: take every Nth frame (1: every frame); target_fps replaces it when set.",
                                minimum=1, allowed="an integer >= 1", widget=Widget(maximum=64))
    target_fps: float = setting(0.0, "Clips: take frames at this rate by their own times (Wan trains at 16 fps, "
                                     "HunyuanVideo at 24); 0: frame_stride instead.",
                                minimum=0.0, allowed="0 or a frame rate > 0", widget=Widget(maximum=240.0, step=0.5))
    frame_extraction: str = setting("head", "Clips with more frames than one window: head trains the first window; "
                                            "uniform trains frame_windows windows spread evenly from the first frame "
                                            "to the last; all trains every consecutive window (musubi-tuner's head, "
                                            "uniform and chunk). A clip shorter than one window is skipped, named.",
                                    choices=FRAME_EXTRACTIONS, allowed=f"one of {FRAME_EXTRACTIONS}", widget=Widget())
    frame_windows: int = setting(1, "frame_extraction uniform: the windows taken from each clip.", minimum=1,
                                 allowed="an integer >= 1", widget=Widget(maximum=100))
    regularization_caption: str = setting("", "Caption of class images without a caption file; empty: the name of "
                                              "their N_class folder (kohya's class token).",
                                          aliases=("--reg-caption",), widget=Widget())

    @property
    def augments_captions(self) -> bool:
        return self.shuffle_tags or self.caption_dropout > 0 or self.tag_dropout > 0

    def __post_init__(self) -> None:
        problem = out_of_range(self, DATASET_SETTINGS)
        if problem:
            raise DatasetError(problem)
        if self.bucketing and not (
            self.bucket_step > 0 and self.bucket_step % 8 == 0 and 0 < self.min_bucket_size <= self.max_bucket_size
        ):
            raise DatasetError(
                f"buckets from {self.min_bucket_size} to {self.max_bucket_size} px in steps of {self.bucket_step} are "
                "invalid; use a step that is a multiple of 8 and 0 < min_bucket_size <= max_bucket_size."
            )
        if self.no_upscale and not self.bucketing:
            raise DatasetError(
                "no_upscale=True needs bucketing=True (square training scales every image to resolution²); turn "
                "bucketing on or no_upscale off."
            )
        if not self.caption_extension.startswith(".") or len(self.caption_extension) < 2:
            raise DatasetError(
                f"caption_extension={self.caption_extension!r} is invalid; use a dotted extension such as '.txt'."
            )


DATASET_SETTINGS = declared_settings(DatasetConfig)
REGULARIZATION_FOLDER = Setting(
    "regularization_folder", str, None,
    "Class images for prior preservation (kohya's reg images, N_class subfolders repeating as kohya's): repeated to "
    "as many examples as the dataset has, their loss weighted by prior_loss_weight.", aliases=("--reg-data",),
    widget=Widget(labels={None: "none"}, note="A folder beside the dataset's; none: no class images."),
)
