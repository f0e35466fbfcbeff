"""Every config key, with its default. The other configs start from this one.

Not meant to be run as is (it names no data); see configs/tiny.py and configs/gpt2.py. The keys,
their defaults, meanings, checks and whether a resume must keep them live with the code that
owns them, one typed group per idea (``dpo_jax/config.py`` lists the groups); the README's table
shows them all (``python bench/config_table.py`` prints it). Key names follow TRL's DPOConfig
where one exists, with the same meaning except where the README's "Where we follow TRL 1.16, and
where not" says.
"""

from dpo_jax import config


def get_config():
    return config.defaults()
