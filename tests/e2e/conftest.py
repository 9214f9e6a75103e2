import pytest

from tests.conftest import worker_env
from tests.e2e.worker_process import running_worker


@pytest.fixture(scope="session")
def worker(settings_env, tmp_path_factory):
    """The real worker, `python handler.py --rp_serve_api`, on a loopback port."""
    env = worker_env(**settings_env, ALLOW_PRIVATE_URLS="1")
    with running_worker(env, tmp_path_factory.mktemp("worker")) as process:
        yield process
