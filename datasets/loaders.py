"""The data loaders main.py trains and evaluates with."""

import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, SequentialSampler

import util.misc as utils
from util.misc import SameSizeBatchSampler

from . import transformed_image_sizes


def build_loaders(dataset_train, dataset_val, args):
    """(train loader or None, its sampler, val loader): shuffled (per process when distributed) and in order.
    On a GPU the batches come in page-locked memory, so that their copies to it overlap with its work."""
    pin_memory = str(args.device).startswith("cuda") and torch.cuda.is_available()

    def loader(dataset, batch_sampler) -> DataLoader:
        if args.num_workers == 0:
            return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=utils.collate_fn, pin_memory=pin_memory)
        # Workers started once for the run instead of again every epoch, and reseeded every epoch as new ones would
        # be seeded (utils.EpochSeededBatches); the loader's own base seed comes from a generator of its own, so that
        # torch's global generator sees the draws of workers started every epoch.
        return DataLoader(
            utils.EpochSeededDataset(dataset),
            batch_sampler=utils.EpochSeededBatches(batch_sampler),
            collate_fn=utils.collate_fn,
            num_workers=args.num_workers,
            pin_memory=pin_memory,
            persistent_workers=True,
            generator=torch.Generator(),
        )

    if args.eval_batching == "size":
        try:
            sizes = transformed_image_sizes(dataset_val)
        except ValueError as e:
            raise SystemExit(
                f"--eval_batching size: cannot tell the val images' sizes ({e}); use --eval_batching padded"
            ) from None
        batch_sampler_val = SameSizeBatchSampler(sizes, args.batch_size, utils.get_world_size(), utils.get_rank())
    else:
        sampler_val = (
            DistributedSampler(dataset_val, shuffle=False)
            if utils.is_dist_avail_and_initialized()
            else SequentialSampler(dataset_val)
        )
        batch_sampler_val = BatchSampler(sampler_val, args.batch_size, drop_last=False)
    data_loader_val = loader(dataset_val, batch_sampler_val)
    if dataset_train is None:
        return None, None, data_loader_val
    sampler_train = (
        DistributedSampler(dataset_train, seed=args.seed)
        if utils.is_dist_avail_and_initialized()
        else RandomSampler(dataset_train)
    )
    data_loader_train = loader(dataset_train, BatchSampler(sampler_train, args.batch_size, drop_last=True))
    return data_loader_train, sampler_train, data_loader_val
