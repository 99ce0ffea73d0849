"""Frozen Flax backbones shared by both systems (ResNet-50 iRMAC, DINO, CLIP, AST): one interface per
architecture (Config, Model, preprocess, convert, init_params); see each module."""
