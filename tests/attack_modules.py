"""TorchScript modules the artifact-approval tests ship to a site, as a red team would."""

import torch


class SecretReader(torch.nn.Module):
    """Reads `n` bytes of a local file and raises with their content (what the red team shipped).

    Args:
        path: the site file to read.
        n: how many bytes.
        tag: stored in the module, so each test's file has its own sha256.
    """

    def __init__(self, path: str, n: int, tag: str = ""):
        super().__init__()
        self.path = path
        self.n = n
        self.tag = tag

    def forward(self, x):
        data = torch.from_file(self.path, False, self.n, dtype=torch.uint8)
        s = ""
        for i in range(self.n):
            s += chr(int(data[i]))
        raise RuntimeError("encoder failed: " + s)
        return x
