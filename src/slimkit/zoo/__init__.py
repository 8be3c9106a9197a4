"""Reference models. Every zoo model records its source, so a saved copy rebuilds by name.

    >>> model = slimkit.zoo.lenet5(num_classes=10)
    >>> model = slimkit.zoo.build("resnet_small", num_classes=10)
    >>> model = slimkit.zoo.external("torchvision:resnet18", num_classes=10)  # or "timm:NAME"
"""
from slimkit.zoo.models import (
    ZOO,
    build,
    for_task,
    lenet5,
    lenet300_100,
    mobilenetv2_small,
    resnet_small,
    vgg_small,
)
from slimkit.zoo.external import external
from slimkit.zoo.pretrained import EFFICIENTNET_LITE_MEAN, EFFICIENTNET_LITE_STD, efficientnet_lite0, minilm

__all__ = ["ZOO", "build", "for_task", "external", "lenet5", "lenet300_100", "vgg_small", "resnet_small",
           "mobilenetv2_small", "efficientnet_lite0", "minilm", "EFFICIENTNET_LITE_MEAN", "EFFICIENTNET_LITE_STD"]
