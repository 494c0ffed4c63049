"""Datasets: real MNIST idx files (:mod:`.mnist`), captioned MNIST scenes
(:mod:`.mnist_captions`) and, later, COCO."""
