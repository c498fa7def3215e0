"""Ray Serve online endpoint and Ray Data batch generation, both around dreamdiff.models.generator.Generator."""
