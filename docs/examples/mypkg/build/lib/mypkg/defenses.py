"""A defense plug-in: a sim.defenses.Defense subclass with declared parameters and a _perturb method."""

from sim.defenses import Defense, Param


class Smooth(Defense):
    """Mix every answer with the uniform distribution: (1 - strength) * y + strength / K."""

    params = {"strength": Param(0.2, low=0, high=1, help="weight of the uniform distribution in every answer")}

    def _perturb(self, y, inputs):
        # y: float64 tensor (N, K) of probabilities; the result must be probabilities too
        k = y.shape[1]
        return (1 - self.values["strength"]) * y + self.values["strength"] / k
