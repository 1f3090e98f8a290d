"""Run `safemerge repair` whose adapter write announces itself and then hangs, so a test can kill it mid-write.

Usage: slow_write.py MARKER_FILE SAFEMERGE_ARGS... The real `adapter_model.safetensors` is written into the staging
directory first, then MARKER_FILE is created and the process sleeps until it is killed.
"""

import sys
import time
from pathlib import Path

from safemerge_callback import adapters, cli


def main() -> None:
    marker = Path(sys.argv[1])
    write = adapters.save_file

    def slow_save_file(tensors, filename, metadata=None):
        write(tensors, filename, metadata=metadata)
        marker.write_text(str(filename))
        time.sleep(600)

    adapters.save_file = slow_save_file
    sys.exit(cli.main(sys.argv[2:]))


if __name__ == "__main__":
    main()
