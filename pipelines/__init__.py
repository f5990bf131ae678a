"""KFP pipelines built from the components; compiled IR YAML sits beside each one."""
