"""Types that catch mistakes: one public Subscription for both twins, a stub that matches
the pure twin, and mypy --strict clean on the package and on a program using all of it."""

from __future__ import annotations

import pytest

import capsule_sessions
from capsule_sessions import Session, Subscription, _framebuf_py
from support import FakeClock

# -- one public Subscription ------------------------------------------------------------


def test_a_subscription_is_a_capsule_sessions_subscription_on_every_backend(backend):
    session = Session("s", clock=FakeClock(), backend=backend)
    with session.subscribe_visual_frames() as sub:
        assert isinstance(sub, Subscription)
        assert isinstance(sub, capsule_sessions.Subscription)
        assert issubclass(type(sub), Subscription)
    assert Subscription is _framebuf_py.Subscription
    assert "Subscription" in capsule_sessions.__all__


def test_the_public_subscription_is_still_made_only_by_a_session():
    with pytest.raises(TypeError, match="subscribe_visual_frames"):
        Subscription()
    assert not isinstance(object(), Subscription)
