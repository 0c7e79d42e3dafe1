"""What the network expects as input: RGB in [0, 1], normalised with the ImageNet statistics its
ResNet backbones were pretrained with (training, inference and previews all use these)."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
