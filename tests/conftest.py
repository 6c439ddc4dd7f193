"""Shared test set-up: hypothesis profiles and the repository root on sys.path."""

import os

from hypothesis import HealthCheck, settings

# No deadlines: the machine is shared and timing is noisy. CI derandomises so a red run can be
# reproduced exactly; locally every run explores new examples.
settings.register_profile("dev", deadline=None, max_examples=100)
settings.register_profile(
    "ci", deadline=None, max_examples=200, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
