"""`python -m spp_detect`: the `spp-detect` command, also what `torchrun -m spp_detect` runs."""

from spp_detect.cli import main

if __name__ == "__main__":
    main()
