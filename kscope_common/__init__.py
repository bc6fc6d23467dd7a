"""Small pieces shared by the controller, the node agent and the facade."""
