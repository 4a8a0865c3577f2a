"""``python -m service``: run the gRPC server (see ``service.server``)."""

import sys

from service.server import main

sys.exit(main())
