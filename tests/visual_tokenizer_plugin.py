"""A user's visual tokenizer plug-in, as `prepare.visual_tokenizer: python:visual_tokenizer_plugin:make`
names it (tests/ on PYTHONPATH): the brightness of each 8-pixel patch in 7 levels."""
import torch

CODEBOOK_SIZE = 7  # no k-means setting gives this size, so a model with it was built from the plug-in


class BrightnessTokenizer:
    codebook_size = CODEBOOK_SIZE
    patch_size = 8

    def tokenize(self, pixels: torch.Tensor) -> torch.Tensor:
        """FloatTensor[B, 3, H, W] in [-1, 1] -> LongTensor[B, (H/8) * (W/8)]."""
        means = torch.nn.functional.avg_pool2d(pixels.float().mean(dim=1, keepdim=True), self.patch_size)
        codes = ((means + 1) / 2 * CODEBOOK_SIZE).long().clamp(0, CODEBOOK_SIZE - 1)
        return codes.flatten(1)


def make() -> BrightnessTokenizer:
    return BrightnessTokenizer()


def make_wrong_patch() -> BrightnessTokenizer:
    tokenizer = BrightnessTokenizer()
    tokenizer.patch_size = 16
    return tokenizer
