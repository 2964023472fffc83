"""ether-diffusion's Gradio app as a Hugging Face Space (or `python apps/gradio_demo/app.py`).

The same app as `ether-diffusion app` (this file only calls it): the base model and the adapters folder come from
ETHER_BASE / ETHER_ADAPTERS_DIR or from the flags; without them, the embedded toy-world model and the default
adapters folder. A Space sets GRADIO_SERVER_NAME / GRADIO_SERVER_PORT, which the app follows.
"""

import sys

from ether_diffusion.app import main

if __name__ == "__main__":
    sys.exit(main())
