"""The original Arrakis walkthrough, with only its imports changed (README: "Coming from
Arrakis"), plus the bench's other decorators.

    python pipelines/coming_from_arrakis.py [STORE]      (default: experiments/)

Run it twice: the second process finds the first's versions and adds calls, never
versions. Then: ``arrakis-ray sql STORE "SELECT * FROM experiments"``.
"""

import sys

import torch

from arrakis_ray.bench import BaseInterpretabilityBench, HookedAutoConfig, HookedAutoModel, PlotSpec

store = sys.argv[1] if len(sys.argv) > 1 else "experiments"

# Step 2: a hooked model from a config (random weights from a fixed seed: no download)
config = HookedAutoConfig(
    name="llama",
    vocab_size=50256,
    hidden_size=8,
    intermediate_size=2,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
)
model = HookedAutoModel(config)


# Step 3: the bench, with a custom tool plugged in
class CustomFunction:
    """A tool of your own: anything, given the model."""

    def __init__(self, model):
        self.model = model

    def embedding_norms(self, token_ids):
        _, cache = self.model.run_with_cache(torch.tensor([token_ids]), hooks=["hook_embed"])
        return cache["hook_embed"][0].norm(dim=-1).tolist()


class MIExperiment(BaseInterpretabilityBench):
    def __init__(self, model, save_dir="experiments"):
        super().__init__(model, save_dir)
        self.tools.update({"custom": CustomFunction(model)})


exp = MIExperiment(model, save_dir=store)


@exp.log_experiment
def attention_experiment():
    print("This is a placeholder for the experiment. Use as is.")
    return 4


attention_experiment()
versions = exp.list_versions("attention_experiment")
print("This is the version hash of the experiment: ", versions)
print(exp.get_version("attention_experiment", versions[0])["source"])


# Step 4: tools
@exp.log_experiment
@exp.use_tools("write_read")
def read_write_analysis(read_layer_idx, write_layer_idx, src_idx, write_read=None):
    write_heads = write_read.identify_write_heads(read_layer_idx)
    read_heads = write_read.identify_read_heads(write_layer_idx, dim_idx=src_idx)
    return {"write_heads": write_heads, "read_heads": read_heads}


print(read_write_analysis(0, 1, 0))

# Step 5: plots (fig is an Altair chart, saved with the experiment version)
generator = torch.Generator().manual_seed(0)
input_ids = torch.randint(3, config.fields["vocab_size"], (1, 8), generator=generator)


@exp.plot_results(
    PlotSpec(plot_type="attention", data_keys="blocks.1.attn.hook_pattern"), input_ids=input_ids
)
def attention_heatmap(fig=None):
    return fig


attention_heatmap()


# The bench's other decorators: a hypothesis test and a profile
@exp.test_hypothesis(alpha=0.05, n_permutations=2000, n_bootstrap=2000)
def residual_grows_through_the_layers(n_sequences=16):
    ids = torch.randint(3, config.fields["vocab_size"], (n_sequences, 8), generator=generator)
    hooks = ["blocks.0.hook_resid_pre", "blocks.3.hook_resid_post"]
    _, cache = model.run_with_cache(ids, hooks=hooks)
    norms = {hook: cache[hook][:, -1].norm(dim=-1) for hook in hooks}
    return {"after block 3": norms[hooks[1]], "before block 0": norms[hooks[0]]}


print(residual_grows_through_the_layers().verdict)


@exp.profile_model
def forward_pass():
    model.run_with_cache(input_ids)


forward_pass()
print(exp.last_profile.select("module", "calls", "seconds", "share_of_time", "params"))
