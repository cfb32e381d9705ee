"""The attacks: pure, stepwise query sources and their declarations (see :mod:`actors.attacks.base`).

A new attack is a module here with an :class:`~actors.attacks.base.Attack` subclass decorated
``@register("attack")``; :mod:`sim.registry` finds it.
"""
