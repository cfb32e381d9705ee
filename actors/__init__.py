"""Attackers and benign users.

- :mod:`actors.attacks`: the attacks, pure stepwise query sources and their declarations;
- :mod:`actors.benign`: honest traffic;
- :mod:`actors.accounts`: which account sends each request (multi-account strategies);
- :mod:`actors.client`: a client driving one source through its accounts, and :mod:`actors.replica`: replica
  training, both pure;
- :mod:`actors.remote`: their Ray wrappers (the client actor, the progress board, the replica task).
"""
