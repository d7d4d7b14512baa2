import sys

from icam_med.cli import main

sys.exit(main())
