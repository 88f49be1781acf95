"""`python -m bayesvlm_ext.demo [--out DIR]`: see bayesvlm_ext.demo.run."""

from .run import main

main()
