"""Start the LoRA Studio app.

The Gradio app (Dataset, Train and Prompt tabs) is not built yet; until it
is, this launcher checks that the engine imports and shows how to use it from
the command line.
"""

from __future__ import annotations

import sys


def main() -> int:
    import core

    print(f"LoRA Studio {core.__version__}")
    print("The desktop app (Dataset, Train and Prompt tabs) is not built yet.")
    print("The training engine works from the command line today:")
    print("  python -m core tiny-model models/tiny                     # a small demo model")
    print("  python -m core train examples/tiny.toml                    # train a LoRA")
    print("  python -m core sample --model models/tiny --lora outputs/tiny-demo/tiny-demo.safetensors \\")
    print("      --prompt 'a photo of sks' --seed 0 --steps 20 --width 64 --height 64 --out sample.png")
    print("See README.md for details.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
