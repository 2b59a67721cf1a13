"""Forms of the web pages. They check shapes; the services they feed check the rules."""

from __future__ import annotations

from django import forms


class SignupForm(forms.Form):
    username = forms.CharField(
        max_length=150,
        min_length=3,
        help_text="3 to 150 letters, digits or . @ + - _",
        widget=forms.TextInput(attrs={"autocomplete": "username", "autofocus": True}),
    )
    email = forms.EmailField(required=False, help_text="optional")
    password1 = forms.CharField(
        label="Password", strip=False, widget=forms.PasswordInput(attrs={"autocomplete": "new-password"})
    )
    password2 = forms.CharField(
        label="Password again", strip=False, widget=forms.PasswordInput(attrs={"autocomplete": "new-password"})
    )

    def clean(self) -> dict:
        data = super().clean()
        if data.get("password1") and data.get("password2") and data["password1"] != data["password2"]:
            self.add_error("password2", "the two passwords differ")
        return data


class ApiKeyCreateForm(forms.Form):
    name = forms.CharField(max_length=100, required=False, help_text="to tell your keys apart, e.g. laptop")
