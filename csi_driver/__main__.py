import sys

from csi_driver.cli import main

sys.exit(main())
