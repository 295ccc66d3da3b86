"""Episodic data: class-indexed datasets, episode sampling, fixed evaluation episodes, dataset loaders."""

from kshot.data.cifar import cifar_fs, fc100
from kshot.data.contract import InputContract, InputError, omniglot_contract
from kshot.data.cub import cub
from kshot.data.dataset import ROTATIONS, ClassDataset, to_float
from kshot.data.folder import image_folder, load_images
from kshot.data.image_cache import read_image_cache, write_image_cache
from kshot.data.miniimagenet import miniimagenet
from kshot.data.omniglot import load_omniglot, omniglot, vinyals_split
from kshot.data.registry import load_dataset
from kshot.data.sampler import EpisodeRequestError, EpisodeSampler, EpisodeSet
from kshot.data.tiered import tiered_imagenet

__all__ = [
    "ROTATIONS", "ClassDataset", "EpisodeRequestError", "EpisodeSampler", "EpisodeSet", "InputContract",
    "InputError", "image_folder", "load_images", "omniglot_contract",
    "load_dataset", "load_omniglot", "omniglot", "to_float", "vinyals_split",
    "miniimagenet", "read_image_cache", "write_image_cache",
    "cifar_fs", "fc100", "cub", "tiered_imagenet",
]
