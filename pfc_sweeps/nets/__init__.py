"""Networks: the built-in ResNets of paper Table I (:mod:`.resnets`) and the hooks that make
any ``nn.Module`` a studied network (:mod:`.hooks`, ``arch=module``)."""
