"""The timm models the foundation is tested on, with the input each needs."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Case:
    name: str
    size: int = 64
    kwargs: dict[str, Any] = field(default_factory=dict)
    leaf_modules: tuple[str, ...] = ()
    why: str = ""  # why a leaf is needed

    def __str__(self) -> str:
        return self.name


_VIT = {"img_size": 64}
ZOO = [
    Case("resnet18"), Case("resnet10t"), Case("resnet50"), Case("resnet26d"), Case("resnet18d"),
    Case("seresnet18"), Case("resnext26ts"), Case("wide_resnet50_2"), Case("res2net50_26w_4s"),
    Case("skresnet18"), Case("resnet50_gn"),
    Case("resnetv2_50"), Case("resnetv2_50x1_bit"),
    Case("densenet121"),
    Case("efficientnet_b0"), Case("tf_efficientnet_b0"), Case("efficientnet_lite0"), Case("tinynet_a"),
    Case("mobilenetv3_small_100"), Case("mobilenetv3_large_100"), Case("mobilenetv2_050"), Case("mnasnet_050"),
    Case("fbnetc_100"), Case("mixnet_s"), Case("ghostnet_050"), Case("lcnet_050"), Case("rexnet_100"),
    Case("regnetx_002"), Case("regnety_002"),
    Case("convnext_atto"), Case("convnextv2_atto"),
    Case("vit_tiny_patch16_224", kwargs=_VIT), Case("deit_tiny_patch16_224", kwargs=_VIT),
    Case("deit_tiny_distilled_patch16_224", kwargs=_VIT), Case("pit_ti_224", kwargs=_VIT),
    Case("coat_lite_tiny", kwargs=_VIT),
    Case("mixer_s16_224", kwargs=_VIT), Case("resmlp_12_224", kwargs=_VIT), Case("gmlp_s16_224", kwargs=_VIT),
    Case("nf_resnet26"), Case("nf_regnet_b0"),
    Case("repvgg_a0"), Case("dla34"), Case("dla46_c"),
    Case("cspresnet50"), Case("cs3darknet_s"),
    Case("inception_v3", size=96), Case("xception41"), Case("dpn68"), Case("hrnet_w18_small"),
    Case("selecsls42b"), Case("tresnet_m"), Case("botnet26t_256", size=256), Case("poolformer_s12"),
    Case("levit_128s", size=224),  # attention modules cache biases in eval: auto-kept as leaves
    Case("vgg11_bn", leaf_modules=("pre_logits",),
         why="ConvMlp.forward branches on x.shape (timm/models/vgg.py: 'if x.shape[-2] < self.input_kernel_size'). "
             "It traces without the leaf too (the branch is decided on timm's default input size, as in "
             "tests/test_dks_models.py); here the head is kept as a leaf so the zoo covers leaf_modules"),
]
