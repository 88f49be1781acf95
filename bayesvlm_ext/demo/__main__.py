"""`python -m bayesvlm_ext.demo [--out DIR]`: see bayesvlm_ext.demo.run."""

from .run import main

if __name__ == "__main__":  # not again in the worker processes it spawns
    main()
