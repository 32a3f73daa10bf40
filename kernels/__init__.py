"""Triton kernels of memoe-fast, installed as ``memoe_fast.kernels``.

The bare name ``kernels`` belongs to Hugging Face's ``kernels`` package, which transformers and
bitsandbytes probe for. Installed, this folder is only ever ``memoe_fast.kernels``, and the tests run
with the checkout off ``sys.path``. Should a script run from the checkout's root import it as the
top-level ``kernels``, it stays inert: it has no version (so transformers' probe reports Hugging Face's
package as absent) and any name asked of it raises an ImportError that says what happened.
"""
if __name__ == "kernels":

    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise ImportError(
            f"cannot import {name!r} from 'kernels': this is the folder kernels/ of a memoe-fast checkout "
            "(the package memoe_fast.kernels), not Hugging Face's 'kernels' package"
        )
