#!/usr/bin/env python
"""Convert an official Swin Transformer ImageNet checkpoint into detectron2's pickle format.

    python tools/convert_swin_to_d2.py swin_tiny_patch4_window7_224.pth swin_tiny_patch4_window7_224.pkl

The input is a torch file holding {"model": state_dict} (as the Swin repository publishes them; a bare state dict
is accepted too). The output is a pickle {"model": state_dict, "__author__": "third_party",
"matching_heuristics": True}: parameter names stay as they are and detectron2's checkpointer matches them to
`backbone.*` by suffix, as for the official Mask2Former tool. Set MODEL.WEIGHTS to the .pkl.
The input is read with torch.load(weights_only=True): tensors only, no arbitrary code.
"""

import argparse
import pickle
import sys

import torch


def convert_swin_state_dict(checkpoint):
    """{"model": state_dict} (or a bare state dict) -> the detectron2 checkpoint dict."""
    state_dict = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict) or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise ValueError("expected a Swin checkpoint: a dict with a 'model' state dict of tensors")
    if not any(k.startswith("patch_embed.") for k in state_dict):
        raise ValueError("no 'patch_embed.*' keys: this does not look like a Swin Transformer state dict")
    return {"model": dict(state_dict), "__author__": "third_party", "matching_heuristics": True}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="official Swin checkpoint (.pth)")
    parser.add_argument("output", help="detectron2 checkpoint to write (.pkl)")
    args = parser.parse_args(argv)

    checkpoint = torch.load(args.input, map_location="cpu", weights_only=True)
    converted = convert_swin_state_dict(checkpoint)
    with open(args.output, "wb") as f:
        pickle.dump(converted, f)
    print(f"wrote {len(converted['model'])} tensors to {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
